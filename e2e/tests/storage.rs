//! A TrainingRun whose payloads and exchange state are in a bucket on a real S3 server
//! (moto, on loopback), through the operator: a refused key is a condition and an Event
//! rather than a crash loop, and once the key is right the run trains with no payload
//! through the exchange.

#![allow(clippy::unwrap_used)] // a test fails by panicking, with the value it got

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;
use starling_operator::api::{Phase, TrainingRun};
use starling_trainer::exchange::storage::s3_server::S3Server;

#[path = "common/runs.rs"]
mod runs;

use runs::*;

/// The bucket's credentials Secret, as a user writes it.
fn credentials_secret(keys: &[(String, String)]) -> Secret {
    let data: serde_json::Map<_, _> = (keys.iter()).map(|(k, v)| (k.clone(), json!(v))).collect();
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "bucket-keys", "namespace": "default"},
        "stringData": data,
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_in_a_bucket_says_its_key_is_refused_then_trains_with_no_payload_through_the_exchange()
 {
    let Some(s3) = S3Server::start() else {
        return;
    };
    s3.create_bucket("runs");
    let _one = ONE_AT_A_TIME.lock().await;
    let (fed, _dir) = federation(&three_members()).await;
    let hub = fed.clusters.hub.client.clone();
    let secrets: Api<Secret> = Api::namespaced(hub.clone(), "default");
    let wrong = [
        ("AWS_ACCESS_KEY_ID".to_owned(), "revoked".to_owned()),
        ("AWS_SECRET_ACCESS_KEY".to_owned(), "revoked".to_owned()),
    ];
    let pp = PostParams::default();
    secrets
        .create(&pp, &credentials_secret(&wrong))
        .await
        .unwrap();
    let runs: Api<TrainingRun> = Api::namespaced(hub.clone(), "default");
    let mut stored = run("stored", 4);
    stored.spec.exchange.storage = Some(
        serde_json::from_value(json!({"url": "s3://runs/stored",
            "endpoint": s3.endpoint(), "credentialsSecret": "bucket-keys"}))
        .unwrap(),
    );
    runs.create(&pp, &stored).await.unwrap();
    let refused = wait_run(&runs, "stored", "the refused key's condition", 120, |r| {
        condition(r, "ExchangeStorage").is_some_and(|(s, _, _)| s == "False")
    })
    .await;
    let (_, reason, message) = condition(&refused, "ExchangeStorage").unwrap();
    assert_eq!(reason, "StorageUnavailable");
    assert!(message.contains("InvalidAccessKeyId"), "{message}");
    let described = kubectl(&fed.clusters.hub.kubeconfig, &["describe", "tr", "stored"]);
    assert!(described.contains("StorageUnavailable"), "{described}");
    // Not a crash loop: the exchange pod waits, whole.
    assert_eq!(restarts(&exchange_pod(&hub).await), 0);

    // The right key. A kubelet updates the mounted Secret within a minute; this one
    // mounts it when the pod starts, so the pod is started again.
    let right = s3.key();
    secrets
        .delete("bucket-keys", &DeleteParams::default())
        .await
        .unwrap();
    secrets
        .create(&pp, &credentials_secret(&right))
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(hub.clone(), "default");
    let exchange = exchange_pod(&hub).await.name_any();
    pods.delete(&exchange, &DeleteParams::default())
        .await
        .unwrap();
    let done = wait_run(&runs, "stored", "Succeeded", 420, |r| {
        phase(r) == Some(Phase::Succeeded)
    })
    .await;
    let (ok, reason, _) = condition(&done, "ExchangeStorage").unwrap();
    assert_eq!((ok, reason), ("True", "StorageReady"));
    let status = done.status.unwrap();
    assert_eq!(status.round, 4);
    // Peers uploaded to the bucket and downloaded from it: the exchange received every
    // update once (from the bucket) and sent none.
    assert!(status.bytes_received > 0, "{status:?}");
    assert_eq!(status.bytes_sent, 0, "{status:?}");
}

fn restarts(pod: &Pod) -> i32 {
    (pod.status.iter())
        .flat_map(|s| s.container_statuses.iter().flatten())
        .map(|c| c.restart_count)
        .sum()
}
