//! Readiness as a kubelet reports it: a container that crashes makes its pod not Ready,
//! and a Deployment counts only Ready pods, with the `Available` and `Progressing`
//! conditions that `kubectl rollout status` and Helm's `--wait` read.

#![allow(clippy::unwrap_used)] // a test fails by panicking, with the value it got

#[path = "common/kubelet.rs"]
mod local;

use std::time::Duration;

use kube::api::{Api, PostParams};
use local::{PATIENCE, cluster};
use serde_json::json;

#[tokio::test]
async fn readiness_follows_the_container_and_a_deployment_counts_only_ready_pods() {
    let c = cluster().await;
    // Runs two seconds, then crashes: ready, then crash-looping.
    let deployment = json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "crashy"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "crashy"}},
            "template": {"metadata": {"labels": {"app": "crashy"}},
                "spec": {"containers": [{"name": "main", "image": "example.com/sh",
                    "command": ["sh", "-c", "sleep 2; exit 1"]}]}}}});
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(c.client.clone(), "default");
    deployments
        .create(
            &PostParams::default(),
            &serde_json::from_value(deployment).unwrap(),
        )
        .await
        .unwrap();
    let condition = |d: &k8s_openapi::api::apps::v1::Deployment, type_: &str| {
        let d = serde_json::to_value(d).unwrap();
        let conditions = d["status"]["conditions"].as_array().cloned();
        let found = (conditions.unwrap_or_default().into_iter()).find(|c| c["type"] == type_);
        let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
        found.map(|c| (text(&c["status"]), text(&c["reason"])))
    };
    let until =
        async |what: &str, done: &dyn Fn(&k8s_openapi::api::apps::v1::Deployment) -> bool| {
            let start = std::time::Instant::now();
            loop {
                let d = deployments.get("crashy").await.unwrap();
                if done(&d) {
                    return d;
                }
                assert!(start.elapsed() < PATIENCE, "never {what}: {:?}", d.status);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
    let available = until("available", &|d| {
        condition(d, "Available").is_some_and(|(s, _)| s == "True")
    })
    .await;
    assert_eq!(available.status.as_ref().unwrap().ready_replicas, Some(1));
    assert_eq!(
        condition(&available, "Progressing"),
        Some(("True".into(), "NewReplicaSetAvailable".into()))
    );
    // Once it crashes, its pod is not Ready and the Deployment has no ready replica.
    let down = until("unavailable after a crash", &|d| {
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
