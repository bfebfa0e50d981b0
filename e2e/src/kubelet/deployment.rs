//! The Deployment and ReplicaSet controllers: a ReplicaSet per Deployment template, its
//! pods from that template, replaced when they fail or the template changes; status and
//! conditions as `kubectl rollout status` and Helm's `--wait` read them.

use std::sync::Arc;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use super::watch::Cache;
use super::{Kubelet, finished, rand_u32};

/// A pod whose Ready condition is True: running, and not crash-looping.
fn pod_ready(pod: &Pod) -> bool {
    let conditions = pod.status.as_ref().and_then(|s| s.conditions.as_ref());
    conditions.is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// A Deployment's `Available` and `Progressing` conditions, as the Deployment controller
/// writes them: with every wanted replica ready, available and done rolling out (what
/// `kubectl rollout status` and Helm's `--wait` look for).
fn conditions(all_ready: bool) -> serde_json::Value {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let (available, progressing) = if all_ready {
        (
            (
                "True",
                "MinimumReplicasAvailable",
                "Deployment has minimum availability.",
            ),
            ("NewReplicaSetAvailable", "its pods are ready"),
        )
    } else {
        (
            (
                "False",
                "MinimumReplicasUnavailable",
                "Deployment does not have minimum availability.",
            ),
            ("ReplicaSetUpdated", "its pods are progressing"),
        )
    };
    json!([
        {"type": "Available", "status": available.0, "reason": available.1,
         "message": available.2, "lastUpdateTime": now, "lastTransitionTime": now},
        {"type": "Progressing", "status": "True", "reason": progressing.0,
         "message": progressing.1, "lastUpdateTime": now, "lastTransitionTime": now},
    ])
}

impl Kubelet {
    /// Converges each Deployment to its template and replica count through a ReplicaSet
    /// per template (named by the template's hash, as `pod-template-hash` labels its
    /// pods); a changed template replaces the old set and its pods (the `Recreate`
    /// strategy).
    pub(super) async fn deployments(&mut self, cache: &Cache, all: &[Pod]) -> kube::Result<()> {
        let sets = cache.replica_sets.state();
        for d in cache.deployments.state() {
            if d.metadata.deletion_timestamp.is_none() {
                self.deployment(&d, &sets, all).await?;
            }
        }
        Ok(())
    }

    async fn deployment(
        &mut self,
        d: &Deployment,
        sets: &[Arc<ReplicaSet>],
        all: &[Pod],
    ) -> kube::Result<()> {
        let ns = d.namespace().unwrap_or_default();
        let uid = d.uid().unwrap_or_default();
        let template = serde_json::to_value(&d.spec.template).unwrap_or_default();
        let hash = format!(
            "{:010x}",
            fnv(template.to_string().as_bytes()) & 0xff_ffff_ffff
        );
        let want = d.spec.replicas.unwrap_or(1).max(0) as usize;
        let name = format!("{}-{hash}", d.name_any());
        let owned: Vec<&Arc<ReplicaSet>> = sets
            .iter()
            .filter(|s| controlled_by(s.as_ref(), &uid))
            .collect();
        for old in owned.iter().filter(|s| s.name_any() != name) {
            self.retire(old, all).await;
        }
        let set = match owned.iter().find(|s| s.name_any() == name) {
            Some(set) => ReplicaSet::clone(set),
            None => self.create_set(d, &name, &template, &hash, want).await?,
        };
        let (replicas, ready) = self.scale(&set, &template, &hash, want, all).await?;
        self.set_status(&set, want, replicas, ready).await?;
        let status = json!({"status": {
            "observedGeneration": d.metadata.generation,
            "replicas": replicas, "updatedReplicas": replicas,
            "readyReplicas": ready, "availableReplicas": ready,
            "unavailableReplicas": want as i32 - ready,
            "conditions": conditions(ready as usize >= want),
        }});
        let current = d
            .status
            .as_ref()
            .map(|s| (s.ready_replicas, s.observed_generation));
        if current != Some((Some(ready), d.metadata.generation)) {
            Api::<Deployment>::namespaced(self.client.clone(), &ns)
                .patch_status(
                    &d.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(status),
                )
                .await?;
        }
        Ok(())
    }

    /// A ReplicaSet of an older template: its pods go, then it does.
    async fn retire(&mut self, set: &ReplicaSet, all: &[Pod]) {
        let ns = set.namespace().unwrap_or_default();
        let uid = set.uid().unwrap_or_default();
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        for p in all.iter().filter(|p| controlled_by(*p, &uid)) {
            if !self.assumed.is_deleted(p) {
                let _ = pods.delete(&p.name_any(), &Default::default()).await;
                self.assumed.deleted(p);
            }
        }
        if set.metadata.deletion_timestamp.is_none() {
            let sets: Api<ReplicaSet> = Api::namespaced(self.client.clone(), &ns);
            let _ = sets.delete(&set.name_any(), &Default::default()).await;
        }
    }

    /// The Deployment's ReplicaSet for the template whose hash is `hash`; one made
    /// already but not yet seen by the watch is read back.
    async fn create_set(
        &self,
        d: &Deployment,
        name: &str,
        template: &serde_json::Value,
        hash: &str,
        want: usize,
    ) -> kube::Result<ReplicaSet> {
        let ns = d.namespace().unwrap_or_default();
        let sets: Api<ReplicaSet> = Api::namespaced(self.client.clone(), &ns);
        let Some(set) = set_from(d, name, template, hash, want) else {
            return sets.get(name).await;
        };
        match sets.create(&Default::default(), &set).await {
            Err(kube::Error::Api(e)) if e.code == 409 => sets.get(name).await,
            other => other,
        }
    }

    /// Converges the set's pods to `want`: finished and surplus ones go, missing ones are
    /// made. Returns how many it has and how many of those are Ready.
    async fn scale(
        &mut self,
        set: &ReplicaSet,
        template: &serde_json::Value,
        hash: &str,
        want: usize,
        all: &[Pod],
    ) -> kube::Result<(usize, i32)> {
        let uid = set.uid().unwrap_or_default();
        let pods: Api<Pod> =
            Api::namespaced(self.client.clone(), &set.namespace().unwrap_or_default());
        let mut keep = vec![];
        let owned: Vec<&Pod> = all
            .iter()
            .filter(|p| !self.assumed.is_deleted(p) && controlled_by(*p, &uid))
            .collect();
        for p in owned {
            if finished(p) {
                let _ = pods.delete(&p.name_any(), &Default::default()).await;
                self.assumed.deleted(p);
            } else {
                keep.push(p);
            }
        }
        for extra in keep.iter().skip(want) {
            let _ = pods.delete(&extra.name_any(), &Default::default()).await;
            self.assumed.deleted(extra);
        }
        for _ in keep.len()..want {
            let Some(pod) = pod_from(set, template, hash) else {
                continue;
            };
            let created = pods.create(&Default::default(), &pod).await?;
            self.assumed.created(created);
        }
        let ready = keep.iter().take(want).filter(|p| pod_ready(p)).count() as i32;
        Ok((keep.len().min(want), ready))
    }

    /// The set's wanted replicas and its status, written when they changed.
    async fn set_status(
        &self,
        set: &ReplicaSet,
        want: usize,
        replicas: usize,
        ready: i32,
    ) -> kube::Result<()> {
        let sets: Api<ReplicaSet> =
            Api::namespaced(self.client.clone(), &set.namespace().unwrap_or_default());
        let want = want as i32;
        if set.spec.replicas != Some(want) {
            let spec = json!({"spec": {"replicas": want}});
            sets.patch(
                &set.name_any(),
                &PatchParams::default(),
                &Patch::Merge(spec),
            )
            .await?;
        }
        let status = set.status.as_ref();
        let seen = status.map(|s| (s.replicas, s.ready_replicas, s.observed_generation));
        let now = (replicas as i32, Some(ready), set.metadata.generation);
        if seen != Some(now) {
            let status = json!({"status": {
                "observedGeneration": set.metadata.generation,
                "replicas": replicas, "fullyLabeledReplicas": replicas,
                "readyReplicas": ready, "availableReplicas": ready}});
            sets.patch_status(
                &set.name_any(),
                &PatchParams::default(),
                &Patch::Merge(status),
            )
            .await?;
        }
        Ok(())
    }
}

/// Whether `object` has a controller reference to the object whose uid is `uid`.
fn controlled_by<K: kube::Resource>(object: &K, uid: &str) -> bool {
    object
        .owner_references()
        .iter()
        .any(|o| o.uid == uid && o.controller == Some(true))
}

/// Deployment `d`'s ReplicaSet `name` for its `template` (whose hash is `hash`): the
/// template's labels and the Deployment's selector, each with `pod-template-hash`.
fn set_from(
    d: &Deployment,
    name: &str,
    template: &serde_json::Value,
    hash: &str,
    want: usize,
) -> Option<ReplicaSet> {
    let mut template = template.clone();
    template["metadata"]["labels"]["pod-template-hash"] = json!(hash);
    let mut selector = serde_json::to_value(&d.spec.selector).ok()?;
    selector["matchLabels"]["pod-template-hash"] = json!(hash);
    let set = json!({"apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {"name": name, "namespace": d.namespace(),
            "labels": template["metadata"]["labels"],
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment",
                "name": d.name_any(), "uid": d.uid(), "controller": true,
                "blockOwnerDeletion": true}]},
        "spec": {"replicas": want, "selector": selector, "template": template}});
    serde_json::from_value(set)
        .map_err(|e| eprintln!("process kubelet: ReplicaSet {name}: {e}"))
        .ok()
}

/// A new pod for ReplicaSet `set`, from its Deployment's `template` (whose hash is
/// `hash`).
fn pod_from(set: &ReplicaSet, template: &serde_json::Value, hash: &str) -> Option<Pod> {
    let name = format!("{}-{:05x}", set.name_any(), rand_u32() & 0xfffff);
    owned_pod(
        template.clone(),
        &name,
        ("apps/v1", "ReplicaSet", set),
        &[("pod-template-hash", hash.to_owned())],
    )
}

/// A pod named `name` from a pod `template`, in its owner's namespace, carrying `labels`
/// and a controller reference to `owner` (API version, kind, object).
pub(super) fn owned_pod<K: kube::Resource>(
    mut pod: serde_json::Value,
    name: &str,
    (api_version, kind, owner): (&str, &str, &K),
    labels: &[(&str, String)],
) -> Option<Pod> {
    pod["apiVersion"] = json!("v1");
    pod["kind"] = json!("Pod");
    pod["metadata"]["name"] = json!(name);
    pod["metadata"]["namespace"] = json!(owner.namespace().unwrap_or_default());
    for (key, value) in labels {
        pod["metadata"]["labels"][*key] = json!(value);
    }
    pod["metadata"]["ownerReferences"] = json!([{
        "apiVersion": api_version, "kind": kind, "name": owner.name_any(),
        "uid": owner.uid().unwrap_or_default(), "controller": true, "blockOwnerDeletion": true}]);
    serde_json::from_value(pod)
        .map_err(|e| eprintln!("process kubelet: {kind} {}: {e}", owner.name_any()))
        .ok()
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}
