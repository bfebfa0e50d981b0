//! The Deployment controller: pods from each Deployment's template, replaced when they
//! fail or the template changes.

use k8s_openapi::api::apps::v1::Deployment;
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
    /// Converges each Deployment's pods to its template and replica count. Pods carry a
    /// hash of the template they were made from; a changed template replaces them
    /// (the `Recreate` strategy).
    pub(super) async fn deployments(&mut self, cache: &Cache, all: &[Pod]) -> kube::Result<()> {
        for d in cache.deployments.state() {
            if d.metadata.deletion_timestamp.is_none() {
                self.deployment(&d, all).await?;
            }
        }
        Ok(())
    }

    async fn deployment(&mut self, d: &Deployment, all: &[Pod]) -> kube::Result<()> {
        let ns = d.namespace().unwrap_or_default();
        let uid = d.uid().unwrap_or_default();
        let spec = d.spec.clone();
        let template = serde_json::to_value(&spec.template).unwrap_or_default();
        let hash = format!(
            "{:010x}",
            fnv(template.to_string().as_bytes()) & 0xff_ffff_ffff
        );
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        let owned: Vec<&Pod> = all
            .iter()
            .filter(|p| {
                !self.assumed.is_deleted(p) && p.owner_references().iter().any(|o| o.uid == uid)
            })
            .collect();
        let mut keep = vec![];
        for p in owned {
            let current = p.labels().get("pod-template-hash") == Some(&hash);
            if current && !finished(p) {
                keep.push(p);
            } else {
                let _ = pods.delete(&p.name_any(), &Default::default()).await;
                self.assumed.deleted(p);
            }
        }
        let want = spec.replicas.unwrap_or(1).max(0) as usize;
        for extra in keep.iter().skip(want) {
            let _ = pods.delete(&extra.name_any(), &Default::default()).await;
            self.assumed.deleted(extra);
        }
        for _ in keep.len()..want {
            let Some(pod) = pod_from(d, &template, &hash) else {
                continue;
            };
            let created = pods.create(&Default::default(), &pod).await?;
            self.assumed.created(created);
        }
        let ready = keep.iter().take(want).filter(|p| pod_ready(p)).count() as i32;
        let status = json!({"status": {
            "observedGeneration": d.metadata.generation,
            "replicas": keep.len().min(want), "updatedReplicas": keep.len().min(want),
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
}

/// A new pod for Deployment `d`, from its `template` (whose hash is `hash`).
fn pod_from(d: &Deployment, template: &serde_json::Value, hash: &str) -> Option<Pod> {
    let name = format!("{}-{hash}-{:05x}", d.name_any(), rand_u32() & 0xfffff);
    owned_pod(
        template.clone(),
        &name,
        ("apps/v1", "Deployment", d),
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
