//! The in-memory object store: one resourceVersion counter for everything, a bounded
//! log of changes for watches, and the write rules a real server applies (optimistic
//! concurrency, generation, status subresource, finalizers).

use std::collections::{BTreeMap, VecDeque};

use serde_json::{Value, json};
use tokio::sync::broadcast;

use super::error::ApiError;
use super::registry::ResourceType;

/// Changes kept for watches; a watch from an older resourceVersion gets 410 Gone.
const LOG_LIMIT: usize = 4096;

/// Where an object lives: group, plural, namespace ("" when cluster-scoped), name.
pub type Key = (String, String, String, String);

#[derive(Clone, Debug)]
pub struct Change {
    pub rv: u64,
    pub group: String,
    pub plural: String,
    pub namespace: String,
    /// `ADDED`, `MODIFIED` or `DELETED`.
    pub kind: &'static str,
    pub object: Value,
}

pub struct Store {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    log: VecDeque<Change>,
    /// The oldest resourceVersion a watch may still start from.
    horizon: u64,
    tx: broadcast::Sender<Change>,
    uids: u64,
}

/// Which part of an object a write may change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// Everything but `status` (when the type has a status subresource).
    Main,
    /// Only `status`.
    Status,
}

impl Default for Store {
    fn default() -> Self {
        let (tx, _) = broadcast::channel(LOG_LIMIT);
        Self {
            rv: 1,
            objects: BTreeMap::new(),
            log: VecDeque::new(),
            horizon: 1,
            tx,
            uids: 0,
        }
    }
}

fn key(t: &ResourceType, namespace: &str, name: &str) -> Key {
    (
        t.group.clone(),
        t.plural.clone(),
        namespace.to_owned(),
        name.to_owned(),
    )
}

/// A timestamp as the API writes them (RFC 3339, whole seconds, UTC).
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

impl Store {
    /// A copy of the objects to try a write on (`dryRun`): what happens to it is seen
    /// by no one.
    pub fn scratch(&self) -> Store {
        Store {
            objects: self.objects.clone(),
            rv: self.rv,
            uids: self.uids,
            horizon: self.rv + 1,
            ..Store::default()
        }
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.tx.subscribe()
    }

    fn record(&mut self, k: &Key, kind: &'static str, object: Value) {
        let change = Change {
            rv: self.rv,
            group: k.0.clone(),
            plural: k.1.clone(),
            namespace: k.2.clone(),
            kind,
            object,
        };
        self.log.push_back(change.clone());
        while self.log.len() > LOG_LIMIT {
            if let Some(old) = self.log.pop_front() {
                self.horizon = old.rv;
            }
        }
        let _ = self.tx.send(change);
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    pub fn get(&self, t: &ResourceType, namespace: &str, name: &str) -> Result<Value, ApiError> {
        self.objects
            .get(&key(t, namespace, name))
            .cloned()
            .ok_or_else(|| ApiError::not_found(&resource_name(t), name))
    }

    /// Objects of `t`, in one namespace or (with `None`) all of them, in key order.
    pub fn list(&self, t: &ResourceType, namespace: Option<&str>) -> Vec<Value> {
        self.list_raw(&t.group, &t.plural, namespace)
    }

    /// [`Store::list`] by group and plural.
    pub fn list_raw(&self, group: &str, plural: &str, namespace: Option<&str>) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|((g, p, ns, _), _)| {
                g == group && p == plural && namespace.is_none_or(|n| n == ns)
            })
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// One object by group, plural, namespace and name.
    pub fn get_raw(
        &self,
        group: &str,
        plural: &str,
        namespace: &str,
        name: &str,
    ) -> Option<&Value> {
        self.objects
            .get(&(group.into(), plural.into(), namespace.into(), name.into()))
    }

    /// Changes to `t` after `rv`, or 410 Gone when the log no longer reaches back that
    /// far.
    pub fn changes_since(&self, t: &ResourceType, rv: u64) -> Result<Vec<Change>, ApiError> {
        if rv < self.horizon {
            return Err(ApiError::gone(format!(
                "too old resource version: {rv} ({})",
                self.horizon
            )));
        }
        Ok(self
            .log
            .iter()
            .filter(|c| c.rv > rv && c.group == t.group && c.plural == t.plural)
            .cloned()
            .collect())
    }

    /// Forgets the change log, including the latest change, as a restarted server's
    /// empty watch cache does: a watch from any version seen so far gets 410.
    pub fn compact(&mut self) {
        self.log.clear();
        self.horizon = self.rv + 1;
    }

    pub fn create(
        &mut self,
        t: &ResourceType,
        namespace: &str,
        mut object: Value,
        validation: FieldValidation,
    ) -> Result<Value, ApiError> {
        check_type(t, &object)?;
        let name = self.name_new(t, namespace, &mut object)?;
        let k = key(t, namespace, &name);
        self.check_vacant(t, namespace, &k, &name)?;
        self.stamp_new(t, &mut object);
        admit(t, &mut object, None, &name, validation)?;
        self.record(&k, "ADDED", object.clone());
        self.objects.insert(k, object.clone());
        Ok(object)
    }

    /// The name a new object is created under: its own, or its `generateName` with a
    /// suffix; its namespace is set to the URL's (and removed for cluster-scoped kinds).
    fn name_new(
        &self,
        t: &ResourceType,
        namespace: &str,
        object: &mut Value,
    ) -> Result<String, ApiError> {
        let meta = object
            .get_mut("metadata")
            .and_then(Value::as_object_mut)
            .ok_or_else(|| {
                ApiError::invalid(
                    &t.kind,
                    "",
                    vec![("metadata".into(), "Required value".into())],
                )
            })?;
        if meta
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .is_empty()
        {
            let Some(prefix) = meta.get("generateName").and_then(Value::as_str) else {
                return Err(ApiError::invalid(
                    &t.kind,
                    "",
                    vec![(
                        "metadata.name".into(),
                        "Required value: name or generateName is required".into(),
                    )],
                ));
            };
            let name = format!("{prefix}{:05x}", self.rv + 1);
            meta.insert("name".into(), json!(name));
        }
        let name = meta["name"].as_str().unwrap_or_default().to_owned();
        if t.namespaced {
            meta.insert("namespace".into(), json!(namespace));
        } else {
            meta.remove("namespace");
        }
        Ok(name)
    }

    /// 409 when an object is already stored at `k`, 404 when the namespace it would be
    /// created in does not exist.
    fn check_vacant(
        &self,
        t: &ResourceType,
        namespace: &str,
        k: &Key,
        name: &str,
    ) -> Result<(), ApiError> {
        if self.objects.contains_key(k) {
            return Err(ApiError::already_exists(&resource_name(t), name));
        }
        if t.namespaced
            && !self.objects.contains_key(&(
                String::new(),
                "namespaces".into(),
                String::new(),
                namespace.to_owned(),
            ))
        {
            return Err(ApiError::not_found("namespaces", namespace));
        }
        Ok(())
    }

    /// Writes what only the server sets on a new object: a uid, its first
    /// resourceVersion, creation time and generation (and no status, for a custom
    /// resource).
    fn stamp_new(&mut self, t: &ResourceType, object: &mut Value) {
        self.uids += 1;
        let rv = self.next_rv();
        if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert(
                "uid".into(),
                json!(format!("00000000-0000-4000-8000-{:012x}", self.uids)),
            );
            meta.insert("resourceVersion".into(), json!(rv.to_string()));
            meta.insert("creationTimestamp".into(), json!(now()));
            meta.insert("generation".into(), json!(1));
            meta.remove("deletionTimestamp");
        }
        if t.group.is_empty() && t.plural == "services" {
            super::services::allocate_cluster_ip(object, self.uids);
        }
        if t.status && !t.group.is_empty() {
            // A custom resource's status is set through the subresource only.
            if let Some(o) = object.as_object_mut() {
                o.remove("status");
            }
        }
    }

    /// Replaces an object (or, with [`Part::Status`], its status) with `object`, checking
    /// its resourceVersion if it carries one.
    pub fn update(
        &mut self,
        t: &ResourceType,
        namespace: &str,
        name: &str,
        mut object: Value,
        part: Part,
        validation: FieldValidation,
    ) -> Result<Value, ApiError> {
        check_type(t, &object)?;
        let k = key(t, namespace, name);
        let current = self
            .objects
            .get(&k)
            .cloned()
            .ok_or_else(|| ApiError::not_found(&resource_name(t), name))?;
        check_replaces(t, name, &object, &current)?;
        keep_other_part(t, part, &mut object, &current);
        keep_server_metadata(&mut object, &current, name)?;
        if t.group.is_empty() && t.plural == "services" {
            super::services::keep_cluster_ip(&mut object, &current);
        }
        admit(t, &mut object, Some(&current), name, validation)?;
        // The generation counts changes to everything but metadata and status.
        if strip(&current) != strip(&object) {
            let generation = current["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
            object["metadata"]["generation"] = json!(generation);
        }
        if object == current_with_rv(&current, &object) {
            return Ok(current); // nothing changed: no new resourceVersion, no event
        }
        // A deleted object whose last finalizer went away is gone now (unless it is a
        // pod waiting out its grace period for its kubelet).
        if object["metadata"]["deletionTimestamp"].is_string()
            && !has_finalizers(&object)
            && !in_grace_period(&object)
        {
            let object = self.remove(&k, object);
            self.collect_garbage();
            return Ok(object);
        }
        Ok(self.put(&k, object))
    }

    /// Deletes an object, or — while it has finalizers — marks it deleted and leaves it
    /// for its finalizers' owners to release. Dependents (by ownerReference) are deleted
    /// after it (background), before it (foreground: it waits, marked, until they are
    /// gone), or kept without the reference (orphan). Deleting a namespace deletes what is
    /// in it. Returns the object as it now is.
    pub fn delete(
        &mut self,
        t: &ResourceType,
        namespace: &str,
        name: &str,
        options: &DeleteOptions,
    ) -> Result<Value, ApiError> {
        let k = key(t, namespace, name);
        let Some(object) = self.objects.get(&k) else {
            return Err(ApiError::not_found(&resource_name(t), name));
        };
        check_preconditions(t, name, object, options)?;
        if let Some(grace) = pod_grace_period(t, object, options.grace_period) {
            return Ok(self.start_grace_period(&k, grace));
        }
        if in_grace_period(object) {
            // The grace period is over (a kubelet's final delete): only finalizers may
            // hold the object now.
            self.edit(&k, |o| {
                o["metadata"]["deletionGracePeriodSeconds"] = json!(0)
            });
        }
        self.propagate(&k, options.propagation);
        if t.plural == "namespaces" && t.group.is_empty() {
            self.delete_contents(&k, name);
        }
        let object = self.delete_key(&k, options.propagation);
        self.collect_garbage();
        Ok(object)
    }

    /// Marks the pod at `k` deleted, for its kubelet to stop within `grace` seconds (a
    /// later delete may shorten that, never lengthen it); the kubelet then deletes it for
    /// good (grace 0). Returns the pod as it now is.
    fn start_grace_period(&mut self, k: &Key, grace: i64) -> Value {
        let shorter = self.objects[k]["metadata"]["deletionGracePeriodSeconds"]
            .as_i64()
            .is_none_or(|g| grace < g);
        if shorter {
            let at = chrono::Utc::now() + chrono::Duration::seconds(grace);
            self.edit(k, |o| {
                o["metadata"]["deletionTimestamp"] =
                    json!(at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
                o["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
            });
        }
        self.objects[k].clone()
    }

    /// What happens to the dependents of the object at `k` as it is deleted: orphans lose
    /// their reference to it; in the foreground it is held, marked, while they are deleted
    /// first. Background dependents are left to the garbage collector.
    fn propagate(&mut self, k: &Key, propagation: Propagation) {
        let uid = self.objects[k]["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        match propagation {
            Propagation::Orphan => {
                for dependent in self.dependents(&uid) {
                    self.edit(&dependent, |o| {
                        if let Some(refs) = o["metadata"]["ownerReferences"].as_array_mut() {
                            refs.retain(|r| r["uid"] != uid.as_str());
                        }
                    });
                }
            }
            Propagation::Foreground if !self.dependents(&uid).is_empty() => {
                self.edit(k, |o| {
                    let finalizers = o["metadata"]["finalizers"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default();
                    if !finalizers.contains(&json!(FOREGROUND)) {
                        let mut f = finalizers;
                        f.push(json!(FOREGROUND));
                        o["metadata"]["finalizers"] = json!(f);
                    }
                });
                for dependent in self.dependents(&uid) {
                    self.delete_key(&dependent, Propagation::Foreground);
                }
            }
            _ => {}
        }
    }

    /// Deletes what is in the namespace `name` (stored at `k`), which is Terminating and
    /// held by a finalizer until that has gone.
    fn delete_contents(&mut self, k: &Key, name: &str) {
        self.edit(k, |o| o["status"]["phase"] = json!("Terminating"));
        let inside: Vec<Key> = self
            .objects
            .keys()
            .filter(|(_, _, ns, _)| ns == name)
            .cloned()
            .collect();
        for object in inside {
            self.delete_key(&object, Propagation::Background);
        }
        if self.holds_objects(name) {
            // Held until what is in it has gone.
            self.edit(k, |o| {
                o["metadata"]["finalizers"] = json!([NAMESPACE_CONTENT]);
            });
        }
    }

    /// Whether any object is stored in the namespace `namespace`.
    fn holds_objects(&self, namespace: &str) -> bool {
        self.objects.keys().any(|(_, _, ns, _)| ns == namespace)
    }

    /// Deletes (or marks, while it has finalizers) the object at `k`.
    fn delete_key(&mut self, k: &Key, propagation: Propagation) -> Value {
        let Some(object) = self.objects.get(k).cloned() else {
            return Value::Null;
        };
        if has_finalizers(&object) {
            if !object["metadata"]["deletionTimestamp"].is_string() {
                self.edit(k, |o| o["metadata"]["deletionTimestamp"] = json!(now()));
            }
            return self.objects[k].clone();
        }
        if propagation == Propagation::Foreground {
            let uid = object["metadata"]["uid"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            for dependent in self.dependents(&uid) {
                self.delete_key(&dependent, Propagation::Foreground);
            }
        }
        self.remove(k, object)
    }

    /// Changes the stored object at `k` in place, as a new version.
    fn edit(&mut self, k: &Key, change: impl FnOnce(&mut Value)) {
        let Some(mut object) = self.objects.get(k).cloned() else {
            return;
        };
        change(&mut object);
        self.put(k, object);
    }

    /// Stores `object` at `k` as a new version (`MODIFIED`); returns it as stored.
    fn put(&mut self, k: &Key, mut object: Value) -> Value {
        let rv = self.next_rv();
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.record(k, "MODIFIED", object.clone());
        self.objects.insert(k.clone(), object.clone());
        object
    }

    /// Removes the object at `k`, whose last state is `object`, as a new version
    /// (`DELETED`); returns that last state.
    fn remove(&mut self, k: &Key, mut object: Value) -> Value {
        self.objects.remove(k);
        let rv = self.next_rv();
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.record(k, "DELETED", object.clone());
        object
    }

    /// Objects with an ownerReference to `uid`.
    fn dependents(&self, uid: &str) -> Vec<Key> {
        self.objects
            .iter()
            .filter(|(_, o)| {
                o["metadata"]["ownerReferences"]
                    .as_array()
                    .is_some_and(|refs| refs.iter().any(|r| r["uid"] == uid))
            })
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// The garbage collector, run to a fixpoint after every deletion: objects whose
    /// owners are all gone are deleted; owners waiting in the foreground for dependents
    /// that are gone, and namespaces that are empty, are released.
    fn collect_garbage(&mut self) {
        loop {
            let uids: std::collections::HashSet<String> = self
                .objects
                .values()
                .filter_map(|o| o["metadata"]["uid"].as_str().map(str::to_owned))
                .collect();
            let orphaned: Vec<Key> = self
                .objects
                .iter()
                .filter(|(_, o)| {
                    o["metadata"]["deletionTimestamp"].is_null()
                        && o["metadata"]["ownerReferences"]
                            .as_array()
                            .is_some_and(|refs| {
                                !refs.is_empty()
                                    && refs.iter().all(|r| {
                                        !uids.contains(r["uid"].as_str().unwrap_or_default())
                                    })
                            })
                })
                .map(|(k, _)| k.clone())
                .collect();
            let released: Vec<Key> = self
                .objects
                .iter()
                .filter(|(k, o)| {
                    let finalizers = o["metadata"]["finalizers"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default();
                    let uid = o["metadata"]["uid"].as_str().unwrap_or_default();
                    (finalizers.contains(&json!(FOREGROUND)) && self.dependents(uid).is_empty())
                        || (finalizers.contains(&json!(NAMESPACE_CONTENT))
                            && !self.holds_objects(&k.3))
                })
                .map(|(k, _)| k.clone())
                .collect();
            if orphaned.is_empty() && released.is_empty() {
                return;
            }
            for k in orphaned {
                self.delete_key(&k, Propagation::Background);
            }
            for k in released {
                self.edit(&k, |o| {
                    if let Some(f) = o["metadata"]["finalizers"].as_array_mut() {
                        f.retain(|f| *f != FOREGROUND && *f != NAMESPACE_CONTENT);
                    }
                });
                if !has_finalizers(&self.objects[&k]) {
                    self.delete_key(&k, Propagation::Background);
                }
            }
        }
    }
}

/// What a delete asks for (`DeleteOptions`).
#[derive(Clone, Debug, Default)]
pub struct DeleteOptions {
    pub propagation: Propagation,
    /// `gracePeriodSeconds`: for pods, how long the kubelet may take to stop them.
    pub grace_period: Option<i64>,
    /// Preconditions: the object must still have this uid and resourceVersion.
    pub uid: Option<String>,
    pub rv: Option<String>,
}

/// A pod on a node is deleted gracefully, as a real server does: it is marked with a
/// deletion time and grace period and left for its kubelet, which stops it and then
/// deletes it with a grace period of 0. Pods on no node, or already finished, go at
/// once. `Some(seconds)` when the deletion is graceful.
fn pod_grace_period(t: &ResourceType, pod: &Value, asked: Option<i64>) -> Option<i64> {
    if !(t.group.is_empty() && t.plural == "pods") {
        return None;
    }
    let bound = pod["spec"]["nodeName"]
        .as_str()
        .is_some_and(|n| !n.is_empty());
    let finished = matches!(
        pod["status"]["phase"].as_str(),
        Some("Succeeded" | "Failed")
    );
    let grace = asked
        .or(pod["spec"]["terminationGracePeriodSeconds"].as_i64())
        .unwrap_or(30);
    (bound && !finished && grace > 0).then_some(grace)
}

/// The finalizer an owner carries while its dependents are deleted first.
const FOREGROUND: &str = "foregroundDeletion";
/// The finalizer a namespace carries until its objects are gone.
const NAMESPACE_CONTENT: &str = "kubernetes";

/// `propagationPolicy`: what happens to an object's dependents.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Propagation {
    #[default]
    Background,
    Foreground,
    Orphan,
}

/// The object without metadata and status: what `generation` counts changes of.
fn strip(object: &Value) -> Value {
    let mut o = object.clone();
    if let Some(map) = o.as_object_mut() {
        map.remove("metadata");
        map.remove("status");
    }
    o
}

/// `current` with `object`'s resourceVersion, so an unchanged write compares equal.
fn current_with_rv(current: &Value, object: &Value) -> Value {
    let mut c = current.clone();
    c["metadata"]["resourceVersion"] = object["metadata"]["resourceVersion"].clone();
    if object["metadata"].get("resourceVersion").is_none()
        && let Some(m) = c["metadata"].as_object_mut()
    {
        m.remove("resourceVersion");
    }
    c
}

/// 400 when `object` is named differently from the URL, 409 when it carries a
/// resourceVersion other than the stored one's (optimistic concurrency).
fn check_replaces(
    t: &ResourceType,
    name: &str,
    object: &Value,
    current: &Value,
) -> Result<(), ApiError> {
    if object["metadata"]["name"]
        .as_str()
        .is_some_and(|n| n != name)
    {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({}) does not match the name on the URL ({name})",
            object["metadata"]["name"]
        )));
    }
    if let Some(rv) = object["metadata"]["resourceVersion"].as_str()
        && rv
            != current["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or_default()
    {
        return Err(ApiError::conflict(&resource_name(t), name));
    }
    Ok(())
}

/// What a write to one part may not change, taken from the stored object: a status
/// write changes only the status (and managed fields), a main write of a type with a
/// status subresource everything but the status.
fn keep_other_part(t: &ResourceType, part: Part, object: &mut Value, current: &Value) {
    match part {
        Part::Status => {
            let status = object.get("status").cloned();
            let managed = object["metadata"].get("managedFields").cloned();
            *object = current.clone();
            set_or_remove(object, "status", status);
            set_or_remove(&mut object["metadata"], "managedFields", managed);
        }
        Part::Main if t.status => set_or_remove(object, "status", current.get("status").cloned()),
        Part::Main => {}
    }
}

/// The metadata only the server writes, taken from the stored object; the name is the
/// URL's. 400 when `object` has no metadata.
fn keep_server_metadata(object: &mut Value, current: &Value, name: &str) -> Result<(), ApiError> {
    let meta = object
        .get_mut("metadata")
        .filter(|m| m.is_object())
        .ok_or_else(|| ApiError::bad_request("metadata is required"))?;
    for fixed in [
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "generation",
        "namespace",
    ] {
        set_or_remove(meta, fixed, current["metadata"].get(fixed).cloned());
    }
    meta["name"] = json!(name);
    Ok(())
}

/// Sets `field` of `object` to `value`, or removes it when there is none.
fn set_or_remove(object: &mut Value, field: &str, value: Option<Value>) {
    match value {
        Some(v) => object[field] = v,
        None => {
            if let Some(o) = object.as_object_mut() {
                o.remove(field);
            }
        }
    }
}

/// Whether finalizers still hold `object`.
fn has_finalizers(object: &Value) -> bool {
    object["metadata"]["finalizers"]
        .as_array()
        .is_some_and(|f| !f.is_empty())
}

/// Whether `object` is a pod its kubelet is still given time to stop.
fn in_grace_period(object: &Value) -> bool {
    object["metadata"]["deletionGracePeriodSeconds"]
        .as_i64()
        .is_some_and(|g| g > 0)
}

/// 412 when a delete's preconditions (uid, resourceVersion) no longer hold for `object`.
fn check_preconditions(
    t: &ResourceType,
    name: &str,
    object: &Value,
    options: &DeleteOptions,
) -> Result<(), ApiError> {
    let meta = &object["metadata"];
    for (field, wanted) in [("uid", &options.uid), ("resourceVersion", &options.rv)] {
        if let Some(wanted) = wanted
            && meta[field].as_str() != Some(wanted)
        {
            return Err(ApiError::precondition_failed(
                &resource_name(t),
                name,
                &format!(
                    "{field} in precondition: {wanted}, {field} in object meta: {}",
                    meta[field].as_str().unwrap_or_default()
                ),
            ));
        }
    }
    Ok(())
}

/// How unknown fields are treated (`fieldValidation`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FieldValidation {
    /// Dropped silently.
    #[default]
    Ignore,
    /// Refused with 400, as `fieldValidation=Strict` asks (kubectl's default).
    Strict,
}

/// A custom resource against its schema: pruned, defaulted, and refused with every
/// problem when invalid.
fn admit(
    t: &ResourceType,
    object: &mut Value,
    old: Option<&Value>,
    name: &str,
    validation: FieldValidation,
) -> Result<(), ApiError> {
    let admission = match &t.schema {
        Some(schema) => {
            let mut admission = super::schema::admit(schema, object);
            if admission.causes.is_empty()
                && let Some(rules) = &t.rules
            {
                admission.causes = super::schema::check_rules(rules, object, old);
            }
            admission
        }
        None => match super::builtin::admit(&t.group, &t.kind, object) {
            None => return Ok(()),
            Some(Ok(admission)) => admission,
            Some(Err(message)) => {
                return Err(ApiError::bad_request(format!(
                    "{} in body is invalid: {message}",
                    t.kind
                )));
            }
        },
    };
    if validation == FieldValidation::Strict && !admission.pruned.is_empty() {
        let unknown: Vec<String> = admission
            .pruned
            .iter()
            .map(|p| format!("unknown field \"{p}\""))
            .collect();
        return Err(ApiError::bad_request(format!(
            "{} in body: strict decoding error: {}",
            t.kind,
            unknown.join(", ")
        )));
    }
    if admission.causes.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(&t.kind, name, admission.causes))
    }
}

fn check_type(t: &ResourceType, object: &Value) -> Result<(), ApiError> {
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    let mut causes = vec![];
    if object["apiVersion"].as_str() != Some(t.api_version().as_str()) {
        causes.push((
            "apiVersion".to_owned(),
            format!(
                "Invalid value: {}: must be {}",
                object["apiVersion"],
                t.api_version()
            ),
        ));
    }
    if object["kind"].as_str() != Some(t.kind.as_str()) {
        causes.push((
            "kind".to_owned(),
            format!("Invalid value: {}: must be {}", object["kind"], t.kind),
        ));
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(&t.kind, name, causes))
    }
}

/// How errors name a resource: `trainingruns.starling.dev`, or `pods` for core kinds.
pub fn resource_name(t: &ResourceType) -> String {
    if t.group.is_empty() {
        t.plural.clone()
    } else {
        format!("{}.{}", t.plural, t.group)
    }
}
