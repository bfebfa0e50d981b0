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
            match meta.get("generateName").and_then(Value::as_str) {
                Some(prefix) => {
                    let name = format!("{prefix}{:05x}", self.rv + 1);
                    meta.insert("name".into(), json!(name));
                }
                None => {
                    return Err(ApiError::invalid(
                        &t.kind,
                        "",
                        vec![(
                            "metadata.name".into(),
                            "Required value: name or generateName is required".into(),
                        )],
                    ));
                }
            }
        }
        let name = meta["name"].as_str().unwrap_or_default().to_owned();
        if t.namespaced {
            meta.insert("namespace".into(), json!(namespace));
        } else {
            meta.remove("namespace");
        }
        let k = key(t, namespace, &name);
        if self.objects.contains_key(&k) {
            return Err(ApiError::already_exists(&resource_name(t), &name));
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
        self.uids += 1;
        let rv = self.next_rv();
        let meta = object["metadata"].as_object_mut().expect("checked above");
        meta.insert(
            "uid".into(),
            json!(format!("00000000-0000-4000-8000-{:012x}", self.uids)),
        );
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        meta.insert("creationTimestamp".into(), json!(now()));
        meta.insert("generation".into(), json!(1));
        meta.remove("deletionTimestamp");
        if t.status && !t.group.is_empty() {
            // A custom resource's status is set through the subresource only.
            if let Some(o) = object.as_object_mut() {
                o.remove("status");
            }
        }
        admit(t, &mut object, None, &name, validation)?;
        self.record(&k, "ADDED", object.clone());
        self.objects.insert(k, object.clone());
        Ok(object)
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
        // What the caller may not change is taken from the stored object.
        match part {
            Part::Status => {
                let status = object.get("status").cloned();
                let managed = object["metadata"].get("managedFields").cloned();
                object = current.clone();
                match status {
                    Some(s) => object["status"] = s,
                    None => {
                        object.as_object_mut().map(|o| o.remove("status"));
                    }
                }
                match managed {
                    Some(m) => object["metadata"]["managedFields"] = m,
                    None => {
                        object["metadata"]
                            .as_object_mut()
                            .map(|o| o.remove("managedFields"));
                    }
                }
            }
            Part::Main if t.status => match current.get("status") {
                Some(s) => object["status"] = s.clone(),
                None => {
                    object.as_object_mut().map(|o| o.remove("status"));
                }
            },
            Part::Main => {}
        }
        let meta = object
            .get_mut("metadata")
            .and_then(Value::as_object_mut)
            .ok_or_else(|| ApiError::bad_request("metadata is required"))?;
        for fixed in [
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "generation",
            "namespace",
        ] {
            match current["metadata"].get(fixed) {
                Some(v) => meta.insert(fixed.into(), v.clone()),
                None => meta.remove(fixed),
            };
        }
        meta.insert("name".into(), json!(name));
        admit(t, &mut object, Some(&current), name, validation)?;
        // The generation counts changes to everything but metadata and status.
        let spec_changed = strip(&current) != strip(&object);
        if spec_changed {
            let generation = current["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
            object["metadata"]["generation"] = json!(generation);
        }
        if object == current_with_rv(&current, &object) {
            return Ok(current); // nothing changed: no new resourceVersion, no event
        }
        let rv = self.next_rv();
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        // A deleted object whose last finalizer went away is gone now (unless it is a
        // pod waiting out its grace period for its kubelet).
        let finalizers_left = object["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        let graceful = object["metadata"]["deletionGracePeriodSeconds"]
            .as_i64()
            .is_some_and(|g| g > 0);
        if object["metadata"]["deletionTimestamp"].is_string() && !finalizers_left && !graceful {
            self.objects.remove(&k);
            self.record(&k, "DELETED", object.clone());
            self.collect_garbage();
            return Ok(object);
        }
        self.record(&k, "MODIFIED", object.clone());
        self.objects.insert(k, object.clone());
        Ok(object)
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
        if let Some(grace) = pod_grace_period(t, object, options.grace_period) {
            // The kubelet stops the pod's process, then deletes it for good (grace 0).
            let shorter = meta["deletionGracePeriodSeconds"]
                .as_i64()
                .is_none_or(|g| grace < g);
            if shorter {
                let at = chrono::Utc::now() + chrono::Duration::seconds(grace);
                self.edit(&k, |o| {
                    o["metadata"]["deletionTimestamp"] =
                        json!(at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
                    o["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
                });
            }
            return Ok(self.objects[&k].clone());
        }
        if meta["deletionGracePeriodSeconds"]
            .as_i64()
            .is_some_and(|g| g > 0)
        {
            // The grace period is over (a kubelet's final delete): only finalizers may
            // hold the object now.
            self.edit(&k, |o| {
                o["metadata"]["deletionGracePeriodSeconds"] = json!(0)
            });
        }
        let propagation = options.propagation;
        let uid = self.objects[&k]["metadata"]["uid"]
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
                self.edit(&k, |o| {
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
        if t.plural == "namespaces" && t.group.is_empty() {
            self.edit(&k, |o| o["status"]["phase"] = json!("Terminating"));
            let inside: Vec<Key> = self
                .objects
                .keys()
                .filter(|(_, _, ns, _)| ns == name)
                .cloned()
                .collect();
            for object in inside {
                self.delete_key(&object, Propagation::Background);
            }
            if self.objects.keys().any(|(_, _, ns, _)| ns == name) {
                // Held until what is in it has gone.
                self.edit(&k, |o| {
                    o["metadata"]["finalizers"] = json!([NAMESPACE_CONTENT]);
                });
            }
        }
        let object = self.delete_key(&k, propagation);
        self.collect_garbage();
        Ok(object)
    }

    /// Deletes (or marks, while it has finalizers) the object at `k`.
    fn delete_key(&mut self, k: &Key, propagation: Propagation) -> Value {
        let Some(mut object) = self.objects.get(k).cloned() else {
            return Value::Null;
        };
        let has_finalizers = object["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if has_finalizers {
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
        self.objects.remove(k);
        let rv = self.next_rv();
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.record(k, "DELETED", object.clone());
        object
    }

    /// Changes the stored object at `k` in place, as a new version.
    fn edit(&mut self, k: &Key, change: impl FnOnce(&mut Value)) {
        let Some(mut object) = self.objects.get(k).cloned() else {
            return;
        };
        change(&mut object);
        let rv = self.next_rv();
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.record(k, "MODIFIED", object.clone());
        self.objects.insert(k.clone(), object);
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
                            && !self.objects.keys().any(|(_, _, ns, _)| *ns == k.3))
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
                let left = self.objects[&k]["metadata"]["finalizers"]
                    .as_array()
                    .is_some_and(|f| !f.is_empty());
                if !left {
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
