//! Readiness as a kubelet reports it: a container that crashes makes its pod not Ready,
//! and a Deployment counts only Ready pods, with the `Available` and `Progressing`
//! conditions that `kubectl rollout status` and Helm's `--wait` read, through a
//! ReplicaSet per template that owns the pods (what Helm's status reader lists).

#![allow(clippy::unwrap_used)] // a test fails by panicking, with the value it got

#[path = "common/kubelet.rs"]
mod local;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use kube::ResourceExt;
use kube::api::Api;
use local::{cluster, wait_for};
use serde_json::json;

/// A Deployment condition's status and reason.
fn condition(d: &Deployment, type_: &str) -> Option<(String, String)> {
    let d = serde_json::to_value(d).unwrap();
    let conditions = d["status"]["conditions"].as_array().cloned();
    let found = (conditions.unwrap_or_default().into_iter()).find(|c| c["type"] == type_);
    let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
    found.map(|c| (text(&c["status"]), text(&c["reason"])))
}

#[tokio::test]
async fn readiness_follows_the_container_and_a_deployment_counts_only_ready_pods() {
    let c = cluster().await;
    // Runs two seconds, then crashes: ready, then crash-looping.
    let deployment = json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "crashy", "namespace": "default"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "crashy"}},
            "template": {"metadata": {"labels": {"app": "crashy"}},
                "spec": {"containers": [{"name": "main", "image": "example.com/sh",
                    "command": ["sh", "-c", "sleep 2; exit 1"]}]}}}});
    starling_e2e::apply(&c.client, &deployment, true)
        .await
        .unwrap();
    let deployments: Api<Deployment> = Api::namespaced(c.client.clone(), "default");
    let available = wait_for(&deployments, "crashy", "available", |d| {
        condition(d, "Available").is_some_and(|(s, _)| s == "True")
    })
    .await;
    assert_eq!(available.status.as_ref().unwrap().ready_replicas, Some(1));
    assert_eq!(
        condition(&available, "Progressing"),
        Some(("True".into(), "NewReplicaSetAvailable".into()))
    );
    // Once it crashes, its pod is not Ready and the Deployment has no ready replica.
    let down = wait_for(&deployments, "crashy", "unavailable after a crash", |d| {
        condition(d, "Available").is_some_and(|(s, _)| s == "False")
    })
    .await;
    assert_eq!(down.status.as_ref().unwrap().ready_replicas, Some(0));
    let pods = c.pods.list(&Default::default()).await.unwrap().items;
    let pod = pods
        .iter()
        .find(|p| kube::ResourceExt::name_any(*p).starts_with("crashy"))
        .unwrap();
    let status = pod.status.as_ref().unwrap();
    let ready = status
        .conditions
        .as_ref()
        .unwrap()
        .iter()
        .find(|c| c.type_ == "Ready");
    assert_eq!(
        ready.map(|c| c.status.as_str()),
        Some("False"),
        "{status:?}"
    );
    assert!(status.container_statuses.as_ref().unwrap()[0].restart_count >= 1);
}

#[tokio::test]
async fn a_deployment_owns_a_replica_set_per_template_which_owns_its_pods() {
    let c = cluster().await;
    let deployment = |script: &str| {
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "main", "image": "example.com/sh",
                    "command": ["sh", "-c", script]}]}}}})
    };
    starling_e2e::apply(&c.client, &deployment("sleep 600"), true)
        .await
        .unwrap();
    let deployments: Api<Deployment> = Api::namespaced(c.client.clone(), "default");
    let sets: Api<ReplicaSet> = Api::namespaced(c.client.clone(), "default");
    let ready = |d: &Deployment| d.status.as_ref().and_then(|s| s.ready_replicas) == Some(2);
    let first = wait_for(&deployments, "web", "ready", ready).await;
    let listed = sets.list(&Default::default()).await.unwrap().items;
    assert_eq!(listed.len(), 1);
    let set = &listed[0];
    let owner = &set.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.clone()),
        ("Deployment", first.uid().unwrap())
    );
    let hash = set.labels()["pod-template-hash"].clone();
    assert_eq!(set.name_any(), format!("web-{hash}"));
    let selector = set.spec.selector.match_labels.clone().unwrap();
    assert_eq!(selector["pod-template-hash"], hash);
    let set = wait_for(&sets, &set.name_any(), "counted", |s| {
        s.status.as_ref().and_then(|s| s.ready_replicas) == Some(2)
    })
    .await;
    assert_eq!(set.status.as_ref().unwrap().replicas, 2);
    let pods = c.pods.list(&Default::default()).await.unwrap().items;
    assert_eq!(pods.len(), 2);
    for pod in &pods {
        let owner = &pod.owner_references()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.clone()),
            ("ReplicaSet", set.uid().unwrap())
        );
        assert!(pod.name_any().starts_with(&format!("web-{hash}-")));
    }

    // A new template: a new set, and the old one goes with its pods.
    starling_e2e::apply(&c.client, &deployment("sleep 601"), true)
        .await
        .unwrap();
    let old = set.name_any();
    wait_for(&deployments, "web", "rolled out", |d| {
        ready(d) && d.status.as_ref().and_then(|s| s.observed_generation) == Some(2)
    })
    .await;
    let start = std::time::Instant::now();
    loop {
        let names: Vec<String> = (sets.list(&Default::default()).await.unwrap().items)
            .iter()
            .map(ResourceExt::name_any)
            .collect();
        if names.len() == 1 && names[0] != old {
            break;
        }
        assert!(
            start.elapsed() < local::PATIENCE,
            "old set stays: {names:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
